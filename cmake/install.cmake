# cmake --install: the headers under include/, the folder libraries, and a CMake package so that
#   find_package(lowbit REQUIRED)  +  target_link_libraries(app PRIVATE lowbit::lowbit)
# works (docs/examples/ is built that way in CI). Private dependencies of the static libraries
# (BLAS, ZLIB) appear in the export as link-only; lowbit-config.cmake finds them.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

foreach(folder core nn optim data quant)
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/${folder}/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/${folder}
          FILES_MATCHING PATTERN "*.h"   # quant/ includes quant/runtime/
          PATTERN "export_onnx.h" EXCLUDE)  # lowbit_onnx (ONNX export) is not part of the installed package
endforeach()

install(TARGETS lowbit_core lowbit_nn lowbit_optim lowbit_data lowbit_quant lowbit_runtime lowbit
        EXPORT lowbit-targets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})

set(LOWBIT_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/lowbit)
install(EXPORT lowbit-targets NAMESPACE lowbit:: DESTINATION ${LOWBIT_CMAKE_DIR})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/lowbit-config.cmake.in
                              ${CMAKE_CURRENT_BINARY_DIR}/lowbit-config.cmake INSTALL_DESTINATION ${LOWBIT_CMAKE_DIR})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/lowbit-config-version.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/lowbit-config.cmake ${CMAKE_CURRENT_BINARY_DIR}/lowbit-config-version.cmake
        DESTINATION ${LOWBIT_CMAKE_DIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/models/ DESTINATION ${CMAKE_INSTALL_DATADIR}/lowbit/models FILES_MATCHING PATTERN "*.json")
